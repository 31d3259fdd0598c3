//! The MeshPolicy CRD in the chart is exactly what `palisade-ca crd` prints.
//! To refresh it: `cargo run -p palisade-ca -- crd > charts/palisade/crds/meshpolicies.palisade.dev.yaml`.

use std::path::Path;
use std::process::Command;

#[test]
fn chart_crd_equals_the_generated_one() {
    let output = Command::new(env!("CARGO_BIN_EXE_palisade-ca"))
        .arg("crd")
        .output()
        .expect("palisade-ca runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let printed = String::from_utf8(output.stdout).unwrap();
    assert_eq!(printed, palisade_ca::kube::crd::crd_yaml());
    let chart = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/palisade/crds/meshpolicies.palisade.dev.yaml");
    let in_chart = std::fs::read_to_string(&chart).unwrap();
    assert!(
        in_chart == printed,
        "{} differs from `palisade-ca crd`: run `cargo run -p palisade-ca -- crd > charts/palisade/crds/meshpolicies.palisade.dev.yaml`",
        chart.display()
    );
    let crd: serde_yaml::Value = serde_yaml::from_str(&printed).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(
        spec["properties"]["allow"]["items"]["properties"]["serviceAccounts"]["maxItems"],
        256
    );
    assert_eq!(
        spec["properties"]["targetSelector"]["properties"]["matchExpressions"]["maxItems"],
        32
    );
}
