"""The Ray Serve RAG application."""
