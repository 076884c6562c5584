"""What user code touches: App, Function and Cls handles, Image, Secret, Volume, decorators.

Nothing here does I/O at import time; talking to the control plane happens on first call.
"""
