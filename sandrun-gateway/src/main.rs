fn main() -> std::process::ExitCode {
    sandrun_gateway::startup::main()
}
