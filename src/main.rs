fn main() {
    eprintln!("usage: palisade demo | palisade inspect CERT.pem | palisade policy check ...");
    std::process::exit(2);
}
