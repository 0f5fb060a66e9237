"""Report: every figure (one style module), the token views, the report page and experiment comparison.
Stages: figure@*, figure_*, pe_heatmap, report. Every figure of the report is one entry of registry.py (file,
section, caption, stage, how it is drawn); the pages are Jinja2 templates in templates/.
"""
