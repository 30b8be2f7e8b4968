"""Serving: the RAG app on Ray Serve (deployments, app builder, OpenAI-compatible HTTP API), the answering path
(``serving.rag``, ``serving.generation``) that runs the same in-process, without Serve, the types that cross
deployments and HTTP (``serving.schemas``), and the one client of that API (``serving.client``)."""
