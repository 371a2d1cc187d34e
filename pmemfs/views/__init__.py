"""What the device is doing, drawn: ``pmemfs top``, the pin heatmap, the Perfetto timeline and progress.

Each module imports its drawing library itself (rich, Pillow), so that the CLI's other
commands start without them.
"""
