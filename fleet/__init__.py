"""fleet: signed software updates for payment-terminal fleets over MQTT."""
