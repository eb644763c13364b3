"""Services for the voice-agent frameworks (Pipecat, LiveKit Agents) that speak this server's WebSocket.

Each framework is imported only by its own module (``pipecat``, ``livekit``), installed with the extra of the same
name; ``wire`` is the framework-free client they share.  Nothing in the server imports this package.
"""
