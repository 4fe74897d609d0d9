//! Generates the Rust code for `proto/*.proto` (rust-protobuf 2 messages plus grpcio
//! service stubs) into OUT_DIR. Nothing generated is committed.

use std::fs;
use std::path::{Path, PathBuf};

use protobuf::Message;

const PROTOS: &[&str] = &[
    "encryptionpb",
    "metapb",
    "errorpb",
    "brpb",
    "logbackuppb",
    "pdpb",
    "mvccpb",
    "etcdserverpb",
    "kvrpcpb",
    "tikvpb",
];

fn main() {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");

    let inputs: Vec<String> = PROTOS.iter().map(|p| format!("proto/{p}.proto")).collect();
    let descriptor_path = out_dir.join("descriptors.pbbin");
    let input_refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    protoc::Protoc::from_env_path()
        .write_descriptor_set(protoc::DescriptorSetOutArgs {
            out: descriptor_path.to_str().expect("OUT_DIR is UTF-8"),
            includes: &["proto"],
            input: &input_refs,
            include_imports: true,
        })
        .unwrap_or_else(|e| panic!("protoc failed ({e}); install it with `apt-get install protobuf-compiler`"));
    let descriptor_bytes = fs::read(&descriptor_path).expect("read descriptor set");
    let descriptors =
        protobuf::descriptor::FileDescriptorSet::parse_from_bytes(&descriptor_bytes).expect("parse descriptor set");
    let files: Vec<String> = PROTOS.iter().map(|p| format!("{p}.proto")).collect();

    protobuf_codegen::gen_and_write(descriptors.get_file(), &files, &out_dir, &protobuf_codegen::Customize::default())
        .expect("generate protobuf messages");
    for service in grpcio_compiler::codegen::gen(descriptors.get_file(), &files) {
        fs::write(out_dir.join(&service.name), service.content).expect("write grpc stubs");
    }

    // The generated files are `include!`d inside `mod` blocks, where inner attributes and
    // inner doc comments are not allowed; src/proto.rs sets the lint allowances instead.
    for entry in fs::read_dir(&out_dir).expect("list OUT_DIR") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            strip_inner_attributes(&path);
        }
    }
}

fn strip_inner_attributes(path: &Path) {
    let text = fs::read_to_string(path).expect("read generated file");
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.starts_with("#![") && !l.starts_with("//!")
        })
        .collect();
    fs::write(path, kept.join("\n")).expect("rewrite generated file");
}
