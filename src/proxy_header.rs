//! PROXY protocol: the header written towards the upstream (`outbound`) and the one read
//! from trusted load balancers (`inbound`).

pub(crate) mod inbound;
pub(crate) mod outbound;

/// The 12 bytes every PROXY v2 header starts with (`\r\n\r\n\0\r\nQUIT\n`).
pub(crate) const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
