"""The OpenAI-compatible HTTP server behind `mixq serve` (an optional extra: `pip install 'mixtral-quant[serve]'`).

engine.py: one worker thread owns the model and decodes the requests that arrive together as one left-padded batch;
app.py: the FastAPI app (schemas, endpoints, auth, errors, request logs) over the engine.
"""
