"""wsproxy's own certificate authority: mint, revoke and publish certificates for mTLS."""
