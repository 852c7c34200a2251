"""e2e_search/confirm"""
