"""The public front (README, "The public front"): the one HTTP server strangers reach, in front of
Cog's server (which must never face them: FACTS.md, "What coglet 0.23.1 trusts")."""
