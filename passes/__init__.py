"""meshwright.passes"""
