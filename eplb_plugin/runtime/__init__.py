"""The reference expert-parallel MoE runtime (see DESIGN.md, "Two hosts for the plugin").

Modules: ``workload`` (synthetic, trace, uniform routing), ``weights`` (deterministic expert
weights and their fingerprints), ``moe`` (one EP MoE layer), ``dense`` (single-process
reference), ``engine`` (one rank's serving loop), ``launch`` (process start-up), ``http``
(control endpoints), ``report`` (text, JSON, PNG). Nothing is imported here: importing the
package stays cheap.
"""
