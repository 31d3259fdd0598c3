//! HTTPS client for the CA API (written next).
