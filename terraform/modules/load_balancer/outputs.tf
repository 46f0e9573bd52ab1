output "dns_name" {
  description = "DNS name of the load balancer (point domain_name at it when DNS is not in Route53)."
  value       = aws_lb.this.dns_name
}

output "zone_id" {
  description = "Hosted zone of the load balancer, for Route53 alias records."
  value       = aws_lb.this.zone_id
}

output "arn" {
  description = "ARN of the load balancer."
  value       = aws_lb.this.arn
}

output "target_group_arn" {
  description = "ARN of the target group holding the GPU hosts (health check: HTTPS /ready)."
  value       = aws_lb_target_group.this.arn
}

output "certificate_arn" {
  description = "ACM certificate served by the HTTPS listener."
  value       = local.certificate_arn
}
