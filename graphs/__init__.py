"""Graph passes: one rewrite rule per file, applied per target by pipeline.py. Sits on bigcode_deploy.runtime only."""
