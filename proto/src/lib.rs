//! gRPC admin API of a gateway pod, generated from `proto/admin.proto`, its mutual TLS, and the
//! pieces a site import is sent in.

pub mod import;
pub mod tls;
pub mod view;

/// `concentrator.admin.v1`
pub mod admin {
    #![allow(
        missing_docs,
        unreachable_pub,
        unused_qualifications,
        clippy::all,
        clippy::pedantic
    )]
    tonic::include_proto!("concentrator.admin.v1");
}
