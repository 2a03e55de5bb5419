"""phi3v_edge.export"""
