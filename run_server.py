#!/usr/bin/env python3
"""Start the CSM-1B WebSocket TTS server: ``python run_server.py --help`` lists the options."""

import sys

from tts_server.app import main

if __name__ == "__main__":
    sys.exit(main())
