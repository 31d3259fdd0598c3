fn main() {
    eprintln!("palisade-injector: not built yet; see docs/DESIGN.md");
    std::process::exit(2);
}
