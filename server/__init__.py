"""The imagewire server process: WebSocket protocol, dispatch, GPU scheduling, HTTP image serving."""
