"""The capture file: schema, device-aware buffers, background writer and reader."""
