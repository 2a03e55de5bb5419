"""phi3v_edge.benchmarks"""
