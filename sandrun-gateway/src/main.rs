fn main() -> std::process::ExitCode {
    sandrun_gateway::app::main()
}
