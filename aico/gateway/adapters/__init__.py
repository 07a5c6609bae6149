"""Protocol adapters: each turns its transport's requests into the router's form and back."""
