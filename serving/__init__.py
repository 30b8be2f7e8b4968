"""Serving: the RAG app on Ray Serve (deployments, app builder, OpenAI-compatible HTTP API) and the answering path
(``serving.rag``, ``serving.generation``) that runs the same in-process, without Serve."""
