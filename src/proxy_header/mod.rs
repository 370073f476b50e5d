//! PROXY protocol: the header written towards the upstream (`outbound`) and the one read
//! from trusted load balancers (`inbound`).

pub(crate) mod inbound;
pub(crate) mod outbound;
