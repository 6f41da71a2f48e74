"""meshwright.ir"""
