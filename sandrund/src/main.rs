//! `sandrund`: sandrun's root helper. Everything lives in the library; see `sandrund::daemon`.

#![forbid(unsafe_code)]

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(sandrund::daemon::main_with_args(&args));
}
