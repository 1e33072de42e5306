"""Where bytes live: local paths and remote URLs (S3, HTTP), read and written the same way."""
