//! Interop with a real nginx receiver (`client_max_body_size 1m`).
