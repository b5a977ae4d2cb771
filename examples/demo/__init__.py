"""The ``make demo`` example: a naive module-level memo against perrequest, under uvicorn."""
