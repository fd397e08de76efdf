//! gRPC admin API of a gateway pod, generated from `proto/admin.proto`, and its mutual TLS.

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
