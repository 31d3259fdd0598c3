fn main() {
    eprintln!("palisade-proxy: not built yet; see docs/DESIGN.md");
    std::process::exit(2);
}
