"""trainables/attention"""
