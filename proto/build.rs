//! Generates the tonic/prost code for `kt.fleet.v1` with a vendored `protoc`,
//! so no system protobuf compiler is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    // Shadow reports go out as JSON (`ktctl shadow report -o json`) as they are.
    for message in [
        "ShadowRun",
        "ShadowGateway",
        "FlipReport",
        "GatewayFlips",
        "FlipCell",
        "FlipCause",
        "ConfigRef",
    ] {
        config.type_attribute(
            format!("kt.fleet.v1.{message}"),
            "#[derive(serde::Serialize)]",
        );
    }
    tonic_prost_build::configure().compile_with_config(
        config,
        &["proto/fleet.proto"],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto/fleet.proto");
    Ok(())
}
