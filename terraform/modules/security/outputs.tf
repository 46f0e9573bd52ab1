output "host_security_group_id" {
  description = "Security group of the GPU hosts."
  value       = aws_security_group.host.id
}

output "monitoring_security_group_id" {
  description = "Security group whose members may scrape the exporter ports; attach it to a monitoring host."
  value       = aws_security_group.monitoring.id
}

output "load_balancer_security_group_id" {
  description = "Security group of the load balancer, or null without one."
  value       = var.create_load_balancer_group ? aws_security_group.load_balancer[0].id : null
}
