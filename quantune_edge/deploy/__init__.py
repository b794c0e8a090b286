"""Stage 4, deploy: targets, SSH transport, the device with its agent, the emulated board."""
