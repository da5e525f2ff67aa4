"""Where LoRAs come from and what their files say; lora_loader.py applies them."""
