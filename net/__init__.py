"""Outbound HTTP shared by every part that reaches the outside on a user's behalf: the SSRF guard
(url_guard) and the guarded fetcher (fetch). LoRA downloads (loras/), the front's input downloads
and its webhook deliveries (front/) all go through it; it imports neither of them."""
