"""phi3v_edge.runtime"""
