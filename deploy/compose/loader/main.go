// compose-config loads a Compose project the way `docker compose config` does, with
// compose-go (the library Docker Compose itself is built on), and prints the resolved
// project as JSON, or the loader's error and exit status 1.
//
// Why: no Docker engine or compose CLI runs here, and the Compose Specification's JSON
// schema checks each file's shape only. The loader also interpolates the .env values
// (failing on a required one that is missing), resolves paths and extends, and checks
// what spans the file: a depends_on naming no service, a volume, network, secret or
// config that is used but not declared, and the like.
//
//	compose-config [--env-file FILE]... COMPOSE_FILE...
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/compose-spec/compose-go/v2/cli"
)

type files []string

func (f *files) String() string     { return fmt.Sprint(*f) }
func (f *files) Set(v string) error { *f = append(*f, v); return nil }

func main() {
	var envFiles files
	flag.Var(&envFiles, "env-file", "an env file to interpolate from (repeatable)")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: compose-config [--env-file FILE]... COMPOSE_FILE...")
		os.Exit(2)
	}
	options, err := cli.NewProjectOptions(
		flag.Args(),
		cli.WithEnvFiles(envFiles...),
		cli.WithDotEnv,
		cli.WithOsEnv,
		cli.WithConsistency(true),
	)
	if err == nil {
		var out []byte
		project, loadErr := options.LoadProject(context.Background())
		if err = loadErr; err == nil {
			out, err = project.MarshalJSON()
			os.Stdout.Write(out)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
