"""trainables/data"""
