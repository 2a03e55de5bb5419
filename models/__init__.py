"""phi3v_edge.models"""
