//! Wire types generated from `proto/` by build.rs: packages and field numbers are upstream's
//! (kvproto, etcd), so real TiKV, PD and etcd understand every message.

macro_rules! generated {
    ($($module:ident => $file:literal),* $(,)?) => {
        $(
            #[allow(
                clippy::all,
                dead_code,
                missing_docs,
                non_camel_case_types,
                non_snake_case,
                non_upper_case_globals,
                unused_imports,
                unused_results,
                renamed_and_removed_lints,
                unused_parens,
                mismatched_lifetime_syntaxes,
                unknown_lints
            )]
            pub mod $module {
                include!(concat!(env!("OUT_DIR"), "/", $file));
            }
        )*
    };
}

generated! {
    encryptionpb => "encryptionpb.rs",
    metapb => "metapb.rs",
    errorpb => "errorpb.rs",
    brpb => "brpb.rs",
    logbackuppb => "logbackuppb.rs",
    logbackuppb_grpc => "logbackuppb_grpc.rs",
    pdpb => "pdpb.rs",
    pdpb_grpc => "pdpb_grpc.rs",
    mvccpb => "mvccpb.rs",
    etcdserverpb => "etcdserverpb.rs",
    etcdserverpb_grpc => "etcdserverpb_grpc.rs",
    kvrpcpb => "kvrpcpb.rs",
    tikvpb_grpc => "tikvpb_grpc.rs",
}
