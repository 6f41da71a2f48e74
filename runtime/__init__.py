"""meshwright.runtime"""
