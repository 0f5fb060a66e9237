"""Core: the errors attnlab reports in one line, the params schema validated once at the edge, atomic
file writes, the device policy and the command-line wrapper every stage runs under. Imports nothing else of attnlab.
"""
