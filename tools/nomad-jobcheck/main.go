// nomad-jobcheck decodes Nomad job JSON strictly into Nomad's own API types
// (github.com/hashicorp/nomad/api), canonicalizes it as the Nomad CLI does, and applies the
// checks Nomad's server would apply before accepting a job. It is mctl's contract check: no
// Nomad agent can run where mctl is developed, so every body mctl would send is checked here.
//
// Usage: nomad-jobcheck [-kind job|scale|revert|variable|frame|exec-in|exec-out|allocs|allocation|
// evaluation|jobs|register-response|deregister-response] [FILE...]   (no FILE: read stdin)
// Each input may hold several JSON documents one after another. Exit status 1 and one line per
// rejected document ("<source> #<n> <job id>: <reason>") when any is rejected.
package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/hashicorp/cronexpr"
	"github.com/hashicorp/nomad/api"
)

// Nomad's server refuses less than these (nomad/structs: MinCPU, MinMemory).
const (
	minCPU      = 1
	minMemoryMB = 10
)

var validName = regexp.MustCompile(`^[a-zA-Z0-9_.-]{1,128}$`)

func main() {
	kind := flag.String("kind", "job", "what each document is: job (JobRegisterRequest), scale (ScalingRequest), revert (JobRevertRequest), variable (Variable) frame (StreamFrame), exec-in (ExecStreamingInput), exec-out (ExecStreamingOutput); answers: allocs ([]AllocationListStub), allocation (Allocation), evaluation (Evaluation), jobs ([]JobListStub), register-response (JobRegisterResponse), deregister-response (JobDeregisterResponse)")
	quiet := flag.Bool("q", false, "print nothing for accepted documents")
	flag.Parse()
	sources := flag.Args()
	failed, total := 0, 0
	check := func(name string, r io.Reader) {
		dec := json.NewDecoder(bufio.NewReader(r))
		dec.DisallowUnknownFields()
		for n := 1; ; n++ {
			id, err := checkOne(dec, *kind)
			if errors.Is(err, io.EOF) {
				return
			}
			total++
			if err != nil {
				failed++
				fmt.Printf("%s #%d %s: %v\n", name, n, id, err)
				if _, ok := err.(decodeError); ok {
					return // the stream cannot be resynchronised after a syntax error
				}
			} else if !*quiet {
				fmt.Printf("%s #%d %s: ok\n", name, n, id)
			}
		}
	}
	if len(sources) == 0 {
		check("stdin", os.Stdin)
	}
	for _, path := range sources {
		f, err := os.Open(path)
		if err != nil {
			fmt.Println(err)
			os.Exit(2)
		}
		check(path, f)
		f.Close()
	}
	fmt.Printf("checked %d, rejected %d\n", total, failed)
	if failed > 0 || total == 0 {
		os.Exit(1)
	}
}

type decodeError struct{ error }

func checkOne(dec *json.Decoder, kind string) (string, error) {
	switch kind {
	case "scale":
		var req api.ScalingRequest
		if err := dec.Decode(&req); err != nil {
			return "-", wrapDecode(err)
		}
		return req.Target["Job"], checkScale(&req)
	case "revert":
		var req api.JobRevertRequest
		if err := dec.Decode(&req); err != nil {
			return "-", wrapDecode(err)
		}
		return req.JobID, checkRevert(&req)
	case "frame": // what mctl reads from /v1/client/fs/logs: checks the tests' frames
		var f api.StreamFrame
		if err := dec.Decode(&f); err != nil {
			return "-", wrapDecode(err)
		}
		return f.File, nil
	case "exec-in": // what mctl sends on /v1/client/allocation/<id>/exec
		var in api.ExecStreamingInput
		if err := dec.Decode(&in); err != nil {
			return "-", wrapDecode(err)
		}
		if in.Stdin == nil && in.TTYSize == nil {
			return "-", fmt.Errorf("an exec input frame needs stdin or tty_size")
		}
		return "stdin", nil
	case "exec-out": // what mctl reads there: checks the tests' frames
		var out api.ExecStreamingOutput
		if err := dec.Decode(&out); err != nil {
			return "-", wrapDecode(err)
		}
		if out.Exited && out.Result == nil {
			return "-", fmt.Errorf("an exited frame needs a result")
		}
		return "output", nil
	// Nomad's answers, as a test's request recorder gives them (tests/test_sandbox_nomad_requests.py):
	// each must decode strictly into the api type the Go client would decode it into.
	case "allocs": // GET /v1/job/:id/allocations
		var stubs []*api.AllocationListStub
		if err := dec.Decode(&stubs); err != nil {
			return "-", wrapDecode(err)
		}
		return "allocations", nil
	case "allocation": // GET /v1/allocation/:id
		var alloc api.Allocation
		if err := dec.Decode(&alloc); err != nil {
			return "-", wrapDecode(err)
		}
		return alloc.ID, nil
	case "evaluation": // GET /v1/evaluation/:id
		var eval api.Evaluation
		if err := dec.Decode(&eval); err != nil {
			return "-", wrapDecode(err)
		}
		return eval.ID, nil
	case "jobs": // GET /v1/jobs
		var stubs []*api.JobListStub
		if err := dec.Decode(&stubs); err != nil {
			return "-", wrapDecode(err)
		}
		return "jobs", nil
	case "register-response": // POST /v1/job/:id
		var resp api.JobRegisterResponse
		if err := dec.Decode(&resp); err != nil {
			return "-", wrapDecode(err)
		}
		return resp.EvalID, nil
	case "deregister-response": // DELETE /v1/job/:id
		var resp api.JobDeregisterResponse
		if err := dec.Decode(&resp); err != nil {
			return "-", wrapDecode(err)
		}
		return resp.EvalID, nil
	case "variable":
		var v api.Variable
		if err := dec.Decode(&v); err != nil {
			return "-", wrapDecode(err)
		}
		if v.Path == "" || len(v.Items) == 0 {
			return v.Path, fmt.Errorf("a variable needs a Path and at least one item")
		}
		return v.Path, nil
	case "job":
		var req api.JobRegisterRequest
		if err := dec.Decode(&req); err != nil {
			return "-", wrapDecode(err)
		}
		if req.Job == nil {
			return "-", fmt.Errorf("no Job in the request")
		}
		req.Job.Canonicalize()
		return deref(req.Job.ID), checkJob(req.Job)
	}
	return "-", fmt.Errorf("unknown -kind %q", kind)
}

func wrapDecode(err error) error {
	if errors.Is(err, io.EOF) {
		return err
	}
	return decodeError{fmt.Errorf("decode: %w", err)}
}

func deref[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

// Nomad's Job.Revert refuses a revert to the version the job is at, and EnforcePriorVersion
// must name the version the job is at now (mctl always sets it).
func checkRevert(req *api.JobRevertRequest) error {
	if !validName.MatchString(req.JobID) {
		return fmt.Errorf("revert JobID %q is not a job ID", req.JobID)
	}
	if req.EnforcePriorVersion == nil {
		return fmt.Errorf("revert without EnforcePriorVersion could undo a change made meanwhile")
	}
	if *req.EnforcePriorVersion == req.JobVersion {
		return fmt.Errorf("can't revert to the current version %d", req.JobVersion)
	}
	return nil
}

func checkScale(req *api.ScalingRequest) error {
	if req.Count == nil || *req.Count < 0 {
		return fmt.Errorf("scale Count must be set and not negative")
	}
	if req.Target["Job"] == "" || req.Target["Group"] == "" {
		return fmt.Errorf("scale Target needs Job and Group")
	}
	return nil
}

func checkJob(job *api.Job) error {
	var errs []string
	bad := func(format string, args ...any) { errs = append(errs, fmt.Sprintf(format, args...)) }
	id := deref(job.ID)
	if !validName.MatchString(id) {
		bad("job ID %q must be 1-128 letters, digits, '_', '.' or '-'", id)
	}
	if deref(job.Name) == "" || strings.ContainsRune(deref(job.Name), 0) {
		bad("job Name is missing")
	}
	jobType := deref(job.Type)
	switch jobType {
	case "service", "batch", "system", "sysbatch":
	default:
		bad("job Type %q is not service, batch, system or sysbatch", jobType)
	}
	if len(job.Datacenters) == 0 {
		bad("job needs at least one datacenter")
	}
	if p := job.Periodic; p != nil && deref(p.Enabled) {
		if jobType != "batch" && jobType != "sysbatch" {
			bad("periodic can only be used with batch jobs, not %s", jobType)
		}
		specs := p.Specs
		if deref(p.Spec) != "" {
			specs = append(specs, *p.Spec)
		}
		if len(specs) == 0 {
			bad("periodic job needs a cron spec")
		}
		for _, spec := range specs {
			if _, err := cronexpr.Parse(spec); err != nil {
				bad("invalid cron spec %q: %v", spec, err)
			}
		}
		if _, err := time.LoadLocation(deref(p.TimeZone)); err != nil {
			bad("invalid time zone %q: %v", deref(p.TimeZone), err)
		}
	}
	if len(job.TaskGroups) == 0 {
		bad("job has no task groups")
	}
	groups := map[string]bool{}
	for _, g := range job.TaskGroups {
		name := deref(g.Name)
		if groups[name] {
			bad("task group %q appears twice", name)
		}
		groups[name] = true
		checkGroup(g, jobType, bad)
	}
	if len(errs) > 0 {
		return errors.New(strings.Join(errs, "; "))
	}
	return nil
}

func checkGroup(g *api.TaskGroup, jobType string, bad func(string, ...any)) {
	name := deref(g.Name)
	if !validName.MatchString(name) {
		bad("group name %q is not valid", name)
	}
	count := deref(g.Count)
	if count < 0 {
		bad("group %s: count %d is negative", name, count)
	}
	if s := g.Scaling; s != nil {
		if s.Enabled == nil || s.Min == nil || s.Max == nil {
			bad("group %s: scaling must set enabled, min and max", name)
		} else {
			if *s.Min < 0 || *s.Max < *s.Min {
				bad("group %s: scaling min %d and max %d are not 0 <= min <= max", name, *s.Min, *s.Max)
			}
			if int64(count) < *s.Min || int64(count) > *s.Max {
				bad("group %s: count %d is outside scaling bounds [%d, %d]", name, count, *s.Min, *s.Max)
			}
		}
		if s.Type != "" && s.Type != "horizontal" {
			bad("group %s: scaling type %q is not horizontal", name, s.Type)
		}
	}
	if r := g.RestartPolicy; r != nil {
		if m := deref(r.Mode); m != "fail" && m != "delay" {
			bad("group %s: restart mode %q is not fail or delay", name, m)
		}
	}
	if r := g.ReschedulePolicy; r != nil && jobType != "system" {
		if deref(r.Unlimited) && deref(r.Attempts) > 0 {
			bad("group %s: reschedule cannot be unlimited and have attempts", name)
		}
		if df := deref(r.DelayFunction); df != "" && df != "constant" && df != "exponential" && df != "fibonacci" {
			bad("group %s: reschedule delay_function %q is unknown", name, df)
		}
	}
	if len(g.Tasks) == 0 {
		bad("group %s has no tasks", name)
	}
	tasks := map[string]bool{}
	for _, t := range g.Tasks {
		if tasks[t.Name] {
			bad("group %s: task %q appears twice", name, t.Name)
		}
		tasks[t.Name] = true
		checkTask(g, t, bad)
	}
}

func checkTask(g *api.TaskGroup, t *api.Task, bad func(string, ...any)) {
	where := deref(g.Name) + "/" + t.Name
	if !validName.MatchString(t.Name) {
		bad("task name %q is not valid", t.Name)
	}
	if t.Driver == "" {
		bad("task %s has no driver", where)
	}
	checkDriverConfig(where, t.Driver, t.Config, bad)
	if r := t.Resources; r != nil {
		if deref(r.CPU) < minCPU && deref(r.Cores) == 0 {
			bad("task %s: cpu %d MHz is below Nomad's minimum %d", where, deref(r.CPU), minCPU)
		}
		if deref(r.MemoryMB) < minMemoryMB {
			bad("task %s: memory %d MB is below Nomad's minimum %d", where, deref(r.MemoryMB), minMemoryMB)
		}
		for _, d := range r.Devices {
			if d.Name == "" || deref(d.Count) == 0 {
				bad("task %s: a device needs a name and a positive count", where)
			}
		}
	}
	if deref(t.KillTimeout) < 0 {
		bad("task %s: kill_timeout is negative", where)
	}
	for _, tmpl := range t.Templates {
		if deref(tmpl.DestPath) == "" {
			bad("task %s: a template needs a destination", where)
		}
		if deref(tmpl.EmbeddedTmpl) == "" && deref(tmpl.SourcePath) == "" {
			bad("task %s: a template needs data or a source", where)
		}
	}
	if v := t.Vault; v != nil && v.Role == "" && len(v.Policies) == 0 {
		bad("task %s: the vault block needs a role or policies", where)
	}
	for _, m := range t.VolumeMounts {
		if _, ok := g.Volumes[deref(m.Volume)]; !ok {
			bad("task %s mounts volume %q that the group does not declare", where, deref(m.Volume))
		}
		if !strings.HasPrefix(deref(m.Destination), "/") {
			bad("task %s: volume destination %q is not an absolute path", where, deref(m.Destination))
		}
	}
	for vname, v := range g.Volumes {
		if v == nil || (v.Type != "host" && v.Type != "csi") || v.Source == "" {
			bad("group %s: volume %q needs type host or csi and a source", deref(g.Name), vname)
			continue
		}
		if v.Type == "csi" {
			checkCSI(deref(g.Name), vname, v, deref(g.Count), bad)
		}
	}
}

// The access-mode rules of Nomad's server for a CSI volume request (nomad/structs
// VolumeRequest.Validate; the structs package is not in the api module, so they are written
// from Nomad's source): reader-only modes need read_only, single-node modes one allocation.
func checkCSI(group, name string, v *api.VolumeRequest, count int, bad func(string, ...any)) {
	switch v.AttachmentMode {
	case "file-system", "block-device":
	case "":
		bad("group %s: CSI volume %q must have an attachment mode", group, name)
	default:
		bad("group %s: CSI volume %q attachment mode %q is unknown", group, name, v.AttachmentMode)
	}
	switch v.AccessMode {
	case "":
		bad("group %s: CSI volume %q must have an access mode", group, name)
	case "single-node-reader-only", "multi-node-reader-only":
		if !v.ReadOnly {
			bad("group %s: volume %q: %s volumes must be read-only", group, name, v.AccessMode)
		}
		if v.AccessMode == "single-node-reader-only" && count > 1 && !v.PerAlloc {
			bad("group %s: volume %q with %s access mode allows only one reader", group, name, v.AccessMode)
		}
	case "single-node-writer":
		if count > 1 && !v.PerAlloc {
			bad("group %s: volume %q with %s access mode allows only one writer", group, name, v.AccessMode)
		}
	case "multi-node-single-writer":
		if !v.ReadOnly && count > 1 && !v.PerAlloc {
			bad("group %s: volume %q with %s access mode allows only one writer", group, name, v.AccessMode)
		}
	case "multi-node-multi-writer":
	default:
		bad("group %s: CSI volume %q access mode %q is unknown", group, name, v.AccessMode)
	}
}

// The drivers' config specs are not in the api module (they live in each driver's hclspec), so
// these are the parts of them mctl renders, written from the drivers' documentation: the keys
// each driver knows (an unknown key fails the job), the required ones and the value shapes.
type configKey struct {
	kind  string // string, strings (a list of strings), bool, number, map, block (a list of one object)
	block []string
}

var driverConfigs = map[string]map[string]configKey{
	"docker": {
		"image": {kind: "string"}, "command": {kind: "string"}, "args": {kind: "strings"},
		"entrypoint": {kind: "strings"}, "volumes": {kind: "strings"}, "work_dir": {kind: "string"},
		"network_mode": {kind: "string"}, "force_pull": {kind: "bool"}, "labels": {kind: "map"},
		"privileged": {kind: "bool"}, "ports": {kind: "strings"}, "cap_add": {kind: "strings"},
		"image_pull_timeout": {kind: "string"}, "runtime": {kind: "string"},
		// a sandbox's restrictions (mctl/plugins/sandbox_nomad.py)
		"cap_drop": {kind: "strings"}, "security_opt": {kind: "strings"}, "init": {kind: "bool"},
		"hostname": {kind: "string"}, "pids_limit": {kind: "number"}, "ulimit": {kind: "map"},
		"auth": {kind: "block", block: []string{"username", "password", "email", "server_address"}},
	},
	"podman": {
		"image": {kind: "string"}, "command": {kind: "string"}, "args": {kind: "strings"},
		"entrypoint": {kind: "strings"}, "volumes": {kind: "strings"}, "working_dir": {kind: "string"},
		"network_mode": {kind: "string"}, "force_pull": {kind: "bool"}, "labels": {kind: "map"},
		"privileged": {kind: "bool"}, "ports": {kind: "strings"}, "cap_add": {kind: "strings"},
		"devices": {kind: "strings"},
		"cap_drop": {kind: "strings"}, "security_opt": {kind: "strings"}, "init": {kind: "bool"},
		"hostname": {kind: "string"},
		"auth":    {kind: "block", block: []string{"username", "password", "tls_verify"}},
	},
	"exec":     {"command": {kind: "string"}, "args": {kind: "strings"}},
	"raw_exec": {"command": {kind: "string"}, "args": {kind: "strings"}},
}

var required = map[string]string{"docker": "image", "podman": "image", "exec": "command", "raw_exec": "command"}

func checkDriverConfig(where, driver string, config map[string]interface{}, bad func(string, ...any)) {
	spec, known := driverConfigs[driver]
	if !known {
		return // a driver mctl does not render: nothing known to check
	}
	if s, _ := config[required[driver]].(string); s == "" {
		bad("task %s: the %s driver needs config %s", where, driver, required[driver])
	}
	for key, value := range config {
		k, ok := spec[key]
		if !ok {
			bad("task %s: the %s driver has no config %q", where, driver, key)
			continue
		}
		if !shaped(value, k) {
			bad("task %s: %s config %q is not a %s", where, driver, key, k.kind)
		}
	}
}

func shaped(value interface{}, k configKey) bool {
	switch k.kind {
	case "string":
		_, ok := value.(string)
		return ok
	case "bool":
		_, ok := value.(bool)
		return ok
	case "number":
		_, ok := value.(float64)
		return ok
	case "map":
		_, ok := value.(map[string]interface{})
		return ok
	case "strings":
		list, ok := value.([]interface{})
		for _, v := range list {
			if _, isString := v.(string); !isString {
				return false
			}
		}
		return ok
	case "block":
		list, ok := value.([]interface{})
		if !ok || len(list) != 1 {
			return false
		}
		body, ok := list[0].(map[string]interface{})
		for field := range body {
			found := false
			for _, name := range k.block {
				found = found || field == name
			}
			if !found {
				return false
			}
		}
		return ok
	}
	return false
}
