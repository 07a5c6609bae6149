"""The users domain: login, token refresh and logout, the caller's profile, user admin."""
