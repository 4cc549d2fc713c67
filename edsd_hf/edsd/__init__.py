from .configuration_edsd import EdsdConfig
