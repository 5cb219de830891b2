#include <iostream>

#include "sdk/cli/cli.h"

int main(int argc, char** argv) { return mandate::cli::RunCli(argc, argv, std::cout, std::cerr); }
